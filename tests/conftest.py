import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import transformers  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

import torch  # noqa: E402

# The suite runs beside subprocess servers on 2 cores: one intra-op thread avoids oversubscription stalls.
torch.set_num_threads(1)
