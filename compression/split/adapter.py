"""What the vendor trains: a method of the compression.methods registry (`lora` by default: `VENDOR_LORA`), applied
to the vendor's blocks only. `prepare_vendor(model, split_layer=, method=)` returns the prepared model and the
parameters to optimise; `vendor_config` restricts a method's `layers` to the blocks above the split (the customer's
blocks and the embeddings are public and frozen: adapters there would never train). Not here: the registry's
methods themselves (compression/methods/).
"""
from __future__ import annotations

import dataclasses

from torch import nn

from compression.methods import get_method, make_trainable, prepare
from compression.methods.lora import LoraConfig

# LoRA on every linear map of the vendor's blocks (the roles compression.families maps to each family's modules)
VENDOR_LORA = LoraConfig(rank=8, alpha=16.0, targets=("query", "key", "value", "attention_output", "ffn_in", "ffn_out"))
# methods whose trainable parameters live inside the classifier's own blocks and head (the vendor runs the blocks
# above the split itself; a side network or reversible adapters replace that forward pass)
VENDOR_METHODS = ("full", "bitfit", "bias_norm", "lora")


def vendor_config(method, *, num_layers: int, split_layer: int):
    """`method` with its `layers` cut to the `num_layers - split_layer` blocks above the split. ValueError for a
    method the vendor cannot run, or for `lora` with no block above the split (nothing to adapt: use `full`, which
    then trains the head alone)."""
    get_method(method.name)  # unknown names: the registry's error
    if method.name not in VENDOR_METHODS:
        raise ValueError(f"the vendor trains one of {VENDOR_METHODS}, not {method.name!r}")
    above = num_layers - split_layer
    if method.name == "lora" and above < 1:
        raise ValueError(f"lora: split_layer {split_layer} leaves the vendor no block to adapt (the model has "
                         f"{num_layers}); use method full (the head alone)")
    layers = method.layers
    return dataclasses.replace(method, layers=above if layers == "all" or layers > above else layers)


def prepare_vendor(model, *, split_layer: int, method) -> tuple[nn.Module, list[nn.Parameter]]:
    """The vendor's model (`method` prepared on it, as `vendor_config` restricts it) and the parameters it trains:
    what `method` selects in blocks `split_layer..` and the head; everything below the split is frozen."""
    method = vendor_config(method, num_layers=model.num_layers, split_layer=split_layer)
    model = prepare(model, method)
    make_trainable(model, method)
    above = {id(p) for layer in list(model.layers)[split_layer:] for p in layer.parameters()}
    for p in model.encoder.parameters():
        if id(p) not in above:
            p.requires_grad_(False)
    return model, [p for p in model.parameters() if p.requires_grad]
