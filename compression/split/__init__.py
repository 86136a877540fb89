"""Split-and-Privatize (Shen et al. 2023): a vendor fine-tunes a customer's model without seeing the customer's text.

The customer holds the embeddings and the first `split_layer` blocks of the public model (frozen) and sends each
batch's token representations privatized with d_chi noise (privacy.mechanisms.dx), contributing tokens optionally
getting less of it; the vendor trains the rest. Every message crosses through crossing.py's one serialised schema.
Entry points, one per pipeline stage: `fine_tune_split` (training.py) and `attack` (audit.py).

customer.py (bottom model, privatization)  vendor.py (top model, optimiser)  adapter.py (the registry method the
vendor trains, LoRA by default)
crossing.py (the wire schema)  transport.py (in-process, HTTP on 127.0.0.1)  contributing.py (CTI)
training.py (the customer's loop, evaluation)  audit.py (inversion attacks, EP)
"""
from compression.split.adapter import VENDOR_LORA
from compression.split.audit import AttackConfig, attack, public_corpus
from compression.split.contributing import CTIConfig
from compression.split.crossing import Crossing, Gradient, Reply
from compression.split.customer import Customer, DXConfig
from compression.split.training import SplitConfig, SplitResult, fine_tune_split
from compression.split.vendor import Vendor, VendorConfig

__all__ = ["VENDOR_LORA", "AttackConfig", "CTIConfig", "Crossing", "Customer", "DXConfig", "Gradient", "Reply",
           "SplitConfig", "SplitResult", "Vendor", "VendorConfig", "attack", "fine_tune_split", "public_corpus"]
