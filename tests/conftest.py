import pytest
import torch

# Tiny models run fastest single-threaded, and CI has 2 cores shared with pytest itself.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _quiet_transformers():
    from cmrkit.utils import quiet_transformers

    quiet_transformers()
