"""Split fine-tuning, driven by the customer: each batch's representations are privatized and sent, the vendor trains
its part on them; the dev split is evaluated through the same crossing (logits come back, dev labels stay home).
`fine_tune_split` is the one call of a pipeline stage. Not here: the parties (customer.py, vendor.py) or the attack
(audit.py).
"""
from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from compression.data import length_chunks, lengths_of
from compression.evaluate import glue_metrics
from compression.losses import task_loss
from compression.models import TextClassifier
from compression.split.contributing import CTIConfig
from compression.split.crossing import Gradient, Reply, from_bytes, to_bytes
from compression.split.customer import Customer, DXConfig
from compression.split.transport import HttpTransport, InProcess, Transport, VendorServer
from compression.split.vendor import Vendor, VendorConfig
from privacy.mechanisms.dx import NoiseStream

OnStep = Callable[[int, dict], None]


@dataclass(frozen=True, kw_only=True)
class SplitConfig:
    """split_layer: blocks on the customer's side (0: the split is at the embedding output). dx, cti: the
    privatization. vendor: what the vendor trains and how. shape: "standard" (labels cross, the vendor holds the
    head) or "u" (the head and the labels stay with the customer; gradients of the pooled features cross back).
    transport: "inprocess" or "http" (a vendor server on 127.0.0.1). epochs, batch_size: the customer's passes and
    batches; seed: the batch order (public: the secret is the noise)."""

    split_layer: int = 0
    dx: DXConfig = field(default_factory=DXConfig)
    cti: CTIConfig = field(default_factory=CTIConfig)
    vendor: VendorConfig = field(default_factory=VendorConfig)
    shape: Literal["standard", "u"] = "standard"
    transport: Literal["inprocess", "http"] = "inprocess"
    epochs: int = 1
    batch_size: int = 32
    eval_batch_size: int = 64
    seed: int = 0

    def __post_init__(self):
        if self.shape not in ("standard", "u") or self.transport not in ("inprocess", "http"):
            raise ValueError(f"shape must be standard/u and transport inprocess/http, got {self.shape!r}, "
                             f"{self.transport!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("epochs, batch_size and eval_batch_size must be >= 1")


@dataclass
class SplitResult:
    """The parties after training and the metrics (dev metric, steps, the d_chi parameters; no training loss: it is
    computed on private data and goes to `on_step` only)."""

    vendor: Vendor
    customer: Customer
    metrics: dict
    head: CustomerHead | None = None


class CustomerHead(torch.nn.Module):
    """The U-shaped split's head on the customer's side: dropout and the linear head of the public model."""

    def __init__(self, model: TextClassifier, *, learning_rate: float):
        super().__init__()
        self.dropout, self.head = copy.deepcopy(model.dropout), copy.deepcopy(model.head)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=learning_rate)
        self.loss = task_loss(model.num_labels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(features))


def _batches(data: dict, *, batch_size: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    """Batches of similar length; in a random order when `generator` is given."""
    chunks = length_chunks(torch.arange(len(data["input_ids"])), lengths_of(data), batch_size)
    if generator is None:
        return chunks
    return [chunks[i] for i in torch.randperm(len(chunks), generator=generator).tolist()]


def _train_batch(customer: Customer, transport: Transport, data: dict, index: torch.Tensor,
                 head: CustomerHead | None) -> float:
    """One step: the standard split sends labels and gets the loss back; the U-shaped one computes the loss here."""
    crossing = customer.crossing(data, index, namespace="train", labels=head is None)
    if head is None:
        return float(from_bytes(transport.send("train", to_bytes(crossing)), expect=Reply).loss)
    features = from_bytes(transport.send("forward", to_bytes(crossing)), expect=Reply).features.requires_grad_()
    loss = head.loss(head(features), data["labels"][index], None).mean()
    loss.backward()
    head.optimizer.step()
    head.optimizer.zero_grad(set_to_none=True)
    transport.send("backward", to_bytes(Gradient(features=features.grad.float())))
    return loss.item()


def train_through(customer: Customer, transport: Transport, train: dict, *, config: SplitConfig,
                  head: CustomerHead | None = None, on_step: OnStep | None = None) -> int:
    """`config.epochs` passes over `train` through `transport`; returns the number of steps. on_step(step, {"loss",
    "num_steps"}) sees the training loss (private data: a local console, never a tracking server) and the total."""
    generator, step = torch.Generator().manual_seed(config.seed), 0
    num_steps = config.epochs * len(_batches(train, batch_size=config.batch_size, generator=None))
    if head is not None:
        head.train()
    for _ in range(config.epochs):
        for index in _batches(train, batch_size=config.batch_size, generator=generator):
            loss = _train_batch(customer, transport, train, index, head)
            step += 1
            if on_step is not None:
                on_step(step, {"loss": loss, "num_steps": num_steps})
    return step


@torch.no_grad()
def predict_through(customer: Customer, transport: Transport, data: dict, *, config: SplitConfig,
                    head: CustomerHead | None = None) -> torch.Tensor:
    """Logits `[N, C]` for `data` (namespace "dev"), privatized like training batches; labels never cross."""
    out = None
    if head is not None:
        head.eval()
    for index in _batches(data, batch_size=config.eval_batch_size, generator=None):
        crossing = customer.crossing(data, index, namespace="dev", labels=False)
        reply = from_bytes(transport.send("eval" if head is None else "features", to_bytes(crossing)), expect=Reply)
        logits = reply.logits if head is None else head(reply.features)
        out = torch.empty(len(data["input_ids"]), logits.shape[1]) if out is None else out
        out[index] = logits
    return out


@contextlib.contextmanager
def connect(vendor: Vendor, transport: str):
    """A transport to `vendor`: in-process, or HTTP to a server on 127.0.0.1 started here and stopped on exit."""
    if transport == "inprocess":
        yield InProcess(vendor)
        return
    with VendorServer(vendor) as server:
        yield HttpTransport(server.url)


def fine_tune_split(model: TextClassifier, train: dict, dev: dict, *, config: SplitConfig, metric: str,
                    noise: NoiseStream | None = None, on_step: OnStep | None = None,
                    on_receive: Callable[[str, bytes], None] | None = None) -> SplitResult:
    """Split fine-tuning of the public `model` on the customer's encoded `train`, evaluated on `dev` (GLUE `metric`).

    noise: the customer's secret noise source (default: seeded from the OS; a seeded stream is the test mode).
    on_receive(route, payload): every message the vendor receives, as bytes (what the vendor saw).
    """
    customer = Customer(model, split_layer=config.split_layer, dx=config.dx, noise=noise)
    customer.fit_contributing(train, config.cti)
    u_shaped = config.shape == "u"
    vendor = Vendor(model, split_layer=config.split_layer, config=config.vendor, u_shaped=u_shaped,
                    on_receive=on_receive)
    head = CustomerHead(model, learning_rate=config.vendor.head_learning_rate) if u_shaped else None
    with connect(vendor, config.transport) as transport:
        num_steps = train_through(customer, transport, train, config=config, head=head, on_step=on_step)
        logits = predict_through(customer, transport, dev, config=config, head=head)
    etas = customer.token_etas
    metrics = {"dev": glue_metrics(metric, logits.numpy(), dev["labels"].numpy()), "num_steps": num_steps,
               "num_train": len(train["input_ids"]), "split_layer": config.split_layer,
               "eta": None if math.isinf(config.dx.eta) else config.dx.eta,
               "eta_contributing": etas.eta_contributing if etas else None,
               "eta_other": etas.eta_other if etas else None, "noise": "seeded" if customer.noise.seeded else "secret",
               "guarantee": guarantee(config)}
    return SplitResult(vendor=vendor, customer=customer, metrics=metrics, head=head)


def guarantee(config: SplitConfig) -> str:
    """What split fine-tuning with `config` guarantees the customer, in words: the d_chi bound per token
    representation (none without noise; with CTI only between tokens given the same eta), and the labels."""
    eta, cti = config.dx.eta, config.cti.enabled
    if math.isinf(eta):
        text = "none: representations cross unperturbed"
    else:
        text = f"d_chi: {eta:g} * ||x - x'|| per token representation (local; never composed into a central epsilon)"
        text += "; with CTI, only between tokens given the same eta (average eta as stated)" if cti else ""
    return text + ("; training labels cross to the vendor unprotected" if config.shape == "standard" else
                   "; labels stay with the customer")
