import os
import sys
from pathlib import Path

# the setting `clicktrain train` runs llvm with, read by OpenMP when torch loads (below)
os.environ.setdefault("GOMP_SPINCOUNT", "2000")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, os.cpu_count() or 1))

from zoo import zoo  # noqa: E402

ZOO = zoo()


@pytest.fixture(params=sorted(ZOO))
def zoo_case(request):
    torch.manual_seed(0)
    factory, example = ZOO[request.param]
    return request.param, factory(), example


def _data_dir():
    here = Path(__file__).resolve().parent.parent
    for d in (os.environ.get("CLICKTRAIN_DATA"), "/usr/share/datasets/fashion-mnist",
              here.parent / "shared" / "data" / "fashion-mnist"):
        if d and any(Path(d).glob("train-images-idx3-ubyte*")):
            return Path(d)
    return None


@pytest.fixture(scope="session")
def fashion_dir():
    d = _data_dir()
    if d is None:
        if os.environ.get("CI"):
            pytest.fail("Fashion-MNIST not found in CI: ./run.sh test installs it (dataset-fashion-mnist)")
        pytest.skip("Fashion-MNIST not found; set CLICKTRAIN_DATA")
    return d
