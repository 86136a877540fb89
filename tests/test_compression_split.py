"""compression.split, the two parties and their one boundary: what the vendor receives is the crossing schema only
(privatized float representations, a uint8 mask, labels on training batches of the standard split; never token ids),
the same bytes over the in-process and the loopback HTTP transport, the split model equals the unsplit one without
noise, and the customer's side never trains."""
import dataclasses
import math

import pytest
import torch

from compression.methods.full import FullConfig
from compression.methods.lora import LoraLinear
from compression.models import build_tiny
from compression.split import VENDOR_LORA, Crossing, Customer, DXConfig, SplitConfig, Vendor, VendorConfig
from compression.split.crossing import Reply, field_names, from_bytes, to_bytes
from compression.split.training import fine_tune_split
from compression.split.transport import HttpTransport, InProcess
from privacy.mechanisms.dx import NoiseStream

VOCAB, MARKERS = 100, (5, 6)  # label 1 starts with token 5, label 0 with token 6


def toy_data(count: int, seed: int) -> dict:
    """[CLS] marker random-tokens [SEP]; the label is which marker."""
    generator = torch.Generator().manual_seed(seed)
    input_ids, labels = [], []
    for _ in range(count):
        body = torch.randint(10, VOCAB, (int(torch.randint(4, 10, (1,), generator=generator)),), generator=generator)
        label = int(torch.rand(1, generator=generator) < 0.5)
        body[0] = MARKERS[0] if label else MARKERS[1]
        input_ids.append([2, *body.tolist(), 3])
        labels.append(label)
    return {"input_ids": input_ids, "token_type_ids": [[0] * len(ids) for ids in input_ids],
            "labels": torch.tensor(labels)}


@pytest.fixture(scope="module")
def model():
    return build_tiny(vocab_size=VOCAB, num_layers=2, seed=0)


def _run(model, *, shape: str, transport: str):
    received = []
    config = SplitConfig(split_layer=1, dx=DXConfig(eta=50.0), shape=shape, transport=transport, batch_size=16,
                         vendor=VendorConfig(method=dataclasses.replace(VENDOR_LORA, rank=2)))
    result = fine_tune_split(model, toy_data(48, 0), toy_data(16, 1), config=config, metric="accuracy",
                             noise=NoiseStream(seed=1), on_receive=lambda route, payload: received.append((route,
                                                                                                         payload)))
    return result, received


@pytest.mark.parametrize("shape", ["standard", "u"])
def test_vendor_sees_only_the_crossing_schema_and_both_transports_carry_the_same_bytes(model, shape):
    result, received = _run(model, shape=shape, transport="inprocess")
    _, over_http = _run(model, shape=shape, transport="http")
    assert received == over_http  # the same messages, byte for byte, over 127.0.0.1
    routes = {route for route, _ in received}
    assert routes == ({"train", "eval"} if shape == "standard" else {"forward", "backward", "features"})
    for route, payload in received:
        if route == "backward":
            assert field_names(payload) == ["features"]
            continue
        crossing = from_bytes(payload, expect=Crossing)
        expected = ["hidden", "attention_mask"] + (["labels"] if route == "train" else [])
        assert field_names(payload) == expected  # labels only on standard training batches; never token ids
        assert crossing.hidden.dtype == torch.float32 and crossing.hidden.shape[-1] == model.encoder.config.hidden_size
        assert crossing.attention_mask.dtype == torch.uint8
        real = crossing.attention_mask.bool()
        assert crossing.hidden[~real].abs().max() == 0  # padding carries nothing
    # training moved the vendor's adapter and never the customer's bottom
    bottom = dict(result.customer.bottom.named_parameters())
    for name, value in model.named_parameters():
        if name in bottom:
            assert torch.equal(bottom[name], value) and not bottom[name].requires_grad
    assert result.metrics["noise"] == "seeded" and "never composed" in result.metrics["guarantee"]
    assert result.metrics["num_steps"] == 3
    lora_b = [p for n, p in result.vendor.model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b)


@pytest.mark.parametrize("split_layer", [0, 1])
def test_the_vendor_trains_the_registry_lora_on_its_own_blocks_only(model, split_layer):
    vendor = Vendor(model, split_layer=split_layer, config=VendorConfig())  # default: VENDOR_LORA
    adapted = {i for i, layer in enumerate(vendor.model.layers) for m in layer.modules() if isinstance(m, LoraLinear)}
    assert adapted == set(range(split_layer, model.num_layers))  # none on the customer's (frozen) blocks
    per_layer = len(VENDOR_LORA.targets)
    assert sum(isinstance(m, LoraLinear) for m in vendor.model.modules()) == per_layer * len(adapted)
    trainable = {n for n, p in vendor.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    exported = vendor.export()  # adapters merged: a plain classifier
    assert not any(isinstance(m, LoraLinear) for m in exported.modules())
    assert not any(isinstance(m, LoraLinear) for m in model.modules())  # the public model itself is untouched


def test_vendor_methods_and_their_limits(model):
    with pytest.raises(ValueError, match="no block to adapt"):
        Vendor(model, split_layer=model.num_layers, config=VendorConfig())
    top = Vendor(model, split_layer=model.num_layers, config=VendorConfig(method=FullConfig(layers="all")))
    assert {n for n, p in top.model.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    from compression.methods.side import SideConfig

    with pytest.raises(ValueError, match="method must be"):
        VendorConfig(method=SideConfig())


@pytest.mark.parametrize("split_layer", [0, 1, 2])
def test_split_without_noise_computes_the_unsplit_model(model, split_layer):
    data = toy_data(8, 2)
    customer = Customer(model, split_layer=split_layer, dx=DXConfig(eta=math.inf), noise=NoiseStream(seed=0))
    method = VENDOR_LORA if split_layer < model.num_layers else FullConfig(layers="all")  # LoRA starts at B = 0
    vendor = Vendor(model, split_layer=split_layer, config=VendorConfig(method=method))
    crossing = customer.crossing(data, torch.arange(8), namespace="dev", labels=False)
    logits = from_bytes(InProcess(vendor).send("eval", to_bytes(crossing)), expect=Reply).logits
    from compression.data import collate

    model.eval()
    with torch.no_grad():
        expected = model(*collate(data, torch.arange(8)))
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_noise_moves_what_crosses_and_is_the_same_on_a_resend(model):
    data = toy_data(4, 3)
    plain = Customer(model, split_layer=1, dx=DXConfig(eta=math.inf)).crossing(data, torch.arange(4),
                                                                                namespace="train", labels=True)
    noisy = Customer(model, split_layer=1, dx=DXConfig(eta=5.0), noise=NoiseStream(seed=3))
    first = noisy.crossing(data, torch.arange(4), namespace="train", labels=True)
    again = noisy.crossing(data, torch.arange(4), namespace="train", labels=True)
    assert torch.equal(first.hidden, again.hidden)  # one draw per example: an epoch resends the same release
    moved = (first.hidden - plain.hidden).norm(dim=-1)[first.attention_mask.bool()]
    hidden_size = model.encoder.config.hidden_size
    assert 0.5 * hidden_size / 5.0 < moved.mean() < 1.5 * hidden_size / 5.0


def test_the_wire_refuses_anything_outside_the_schema():
    crossing = Crossing(hidden=torch.randn(2, 3, 4), attention_mask=torch.ones(2, 3, dtype=torch.uint8),
                        labels=torch.tensor([0, 1]))
    decoded = from_bytes(to_bytes(crossing), expect=Crossing)
    assert torch.equal(decoded.hidden, crossing.hidden) and torch.equal(decoded.labels, crossing.labels)
    with pytest.raises(ValueError, match="hidden"):  # token ids are not representations
        Crossing(hidden=torch.ones(2, 3, 4, dtype=torch.int64), attention_mask=torch.ones(2, 3, dtype=torch.uint8))
    smuggled = to_bytes(crossing).replace(b'"name":"labels"', b'"name":"tokens"')
    with pytest.raises(ValueError, match="outside the schema"):
        from_bytes(smuggled, expect=Crossing)
    with pytest.raises(ValueError, match="trailing"):
        from_bytes(to_bytes(crossing) + b"\x00", expect=Crossing)
    with pytest.raises(ValueError, match="expected Reply"):
        from_bytes(to_bytes(crossing), expect=Reply)
    with pytest.raises(ValueError, match="loopback"):
        HttpTransport("http://example.com:8000")
