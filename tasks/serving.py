"""The registered model's code: an MLflow pyfunc over an exported HF folder (compression/export.py), logged as "models
from code" (tasks/tracking.register_model), so nothing is pickled. It maps a DataFrame column `text` (and `text_pair`
for sentence-pair tasks) to the predicted `label` and its probability `score` (a regression task: `score` only).

MLflow copies this file into the model and runs it when the model loads: it may import only mlflow, pandas, torch
and transformers, never dpcompress.
"""
from __future__ import annotations

import pandas as pd
import torch
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

BATCH_SIZE = 32
MAX_LENGTH = 512


class TextClassifier(PythonModel):
    """Text in, label out: the HF folder in the artifact `model`, on the CPU."""

    def load_context(self, context) -> None:
        folder = context.artifacts["model"]
        # the folder's own modeling file (written by dpcompress with the model) builds the classifier; its config,
        # which the tokenizer reads too, names it (without trust_remote_code transformers would ask on stdin)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        if self.tokenizer.pad_token is None:  # e.g. GPT-2's: padding reaches no pooled position (right padding)
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.tokenizer.padding_side = "right"  # what the exported model expects
        self.model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        frame = pd.DataFrame(model_input)
        if "text" not in frame.columns:
            raise ValueError(f"the input needs a column 'text' (and 'text_pair' for sentence pairs); got "
                             f"{list(frame.columns)}")
        texts = frame["text"].astype(str).tolist()
        pairs = frame["text_pair"].astype(str).tolist() if "text_pair" in frame.columns else None
        logits = torch.cat([self._logits(texts[i:i + BATCH_SIZE], pairs and pairs[i:i + BATCH_SIZE])
                            for i in range(0, len(texts), BATCH_SIZE)]) if texts else torch.zeros(0, 1)
        if self.model.config.num_labels == 1:
            return pd.DataFrame({"score": logits[:, 0].tolist()})
        probabilities = logits.softmax(-1)
        scores, indices = probabilities.max(-1)
        names = self.model.config.id2label
        return pd.DataFrame({"label": [names[int(i)] for i in indices], "score": scores.tolist()})

    @torch.inference_mode()
    def _logits(self, texts: list[str], pairs: list[str] | None) -> torch.Tensor:
        positions = (self.model.config.encoder_config or {}).get("max_position_embeddings", MAX_LENGTH)
        limit = min(MAX_LENGTH, self.tokenizer.model_max_length, positions)
        batch = self.tokenizer(texts, pairs, padding=True, truncation=True, max_length=limit, return_tensors="pt")
        return self.model(**batch).logits.float()


set_model(TextClassifier())
