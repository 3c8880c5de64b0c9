import os
import tempfile

import pytest

# Tests never reach the network and never touch the user's Hugging Face cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="fedmole-hf-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tiny test models gain nothing from a second thread, and OpenMP spin-waits badly on a busy machine
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_tok():
    from fedmole.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.padding_side = "left"
    return tok
