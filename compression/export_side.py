"""Export of a side model (compression.methods.side): the portable classes that run the frozen backbone, then the
ladder side network on its hidden states, and what `compression.export.export_hf` writes for them. The classes below
and the side network's (compression/methods/side_network.py) are copied verbatim into the exported folder.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from compression.export import PORTABLE, DPCompressConfig, DPCompressForSequenceClassification, Portable
from compression.methods.side_network import Gate, LadderSide

_SIDE_HEADER = '''"""A dpcompress side model: a frozen HF base model (its own config nested, built with AutoModel)
whose hidden states feed a ladder side network (Ladder Side-Tuning) through down-projections and gates; pooling; a
linear head on the side network's output. Written by dpcompress (compression/export_side.py); depends only on torch
and transformers."""
import copy

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import SequenceClassifierOutput
'''


# --- the portable side model: copied verbatim into the exported folder --------------------------------------------

class DPCompressSideConfig(DPCompressConfig):
    """DPCompressConfig plus `side`, the side network's spec (widths, the backbone layers it follows, gate T)."""

    model_type = "dpcompress_side"
    side: dict | None = None


class DPCompressSideForSequenceClassification(DPCompressForSequenceClassification):
    """The base model (frozen weights) -> its hidden states after the embeddings and after every layer the side network
    follows -> the side network -> pooling over real tokens -> dropout -> linear classifier."""

    config_class = DPCompressSideConfig

    def __init__(self, config):
        super().__init__(config)
        layers = self.encoder
        for name in config.layers_path.split("."):
            layers = getattr(layers, name)
        self.side = LadderSide(self.encoder.config, config.side, type(layers[0]))
        self.classifier = nn.Linear(config.side["hidden_size"], config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        mask, inputs = self._inputs(input_ids, attention_mask, token_type_ids, kwargs)
        states = self.encoder(**inputs, output_hidden_states=True).hidden_states
        hidden = self.side(torch.stack([states[i] for i in self.side.taps], dim=2), mask)
        return self._output(self._pool(hidden, mask), labels)


# --- what export_hf writes ---------------------------------------------------------------------------------------

def modeling_source() -> str:
    """The modeling file of a side model's folder: imports, the plain classes, the side network, the side classes."""
    classes = (DPCompressConfig, DPCompressForSequenceClassification, Gate, LadderSide, DPCompressSideConfig,
               DPCompressSideForSequenceClassification)
    return "\n\n".join([_SIDE_HEADER] + [inspect.getsource(c) for c in classes])


def portable(model, state: dict[str, torch.Tensor]) -> Portable:
    """`compression.export.PORTABLE` for a side model: its classes, modeling file, the side spec, and the plain
    weights plus the side network's."""
    return Portable(DPCompressSideConfig, DPCompressSideForSequenceClassification, modeling_source(),
                    {"side": dict(model.side.spec)},
                    {**state, **{f"side.{k}": v for k, v in model.side.state_dict().items()}})


PORTABLE["side"] = portable
