import os
import shutil
import tempfile

import pytest

# Tests never reach the network and never touch the user's Hugging Face cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if "HF_HOME" not in os.environ:
    _HF_HOME = os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="fedmole-hf-")  # removed when the session ends
else:
    _HF_HOME = None
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tiny test models gain nothing from a second thread, and OpenMP spin-waits badly on a busy machine
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_sessionfinish(session, exitstatus):
    if _HF_HOME is not None:
        shutil.rmtree(_HF_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_tok():
    from fedmole.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.padding_side = "left"
    return tok
