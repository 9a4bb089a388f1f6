import pytest
import torch


@pytest.fixture
def float64():
    """Float64 as torch's default dtype for the test (restored after it): the dense references
    of the optimizer tests (``pytestmark = pytest.mark.usefixtures("float64")``)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
