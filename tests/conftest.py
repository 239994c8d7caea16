import pytest

import sdipc_lab as S
from sdipc_lab.build import FULL_WIDTH, random_components
from sdipc_lab.toyworld import sample


@pytest.fixture(scope="session")
def lab():
    """The random 'tiny' lab, loaded through the same folder loader as every other source."""
    return S.load_lab("tiny", device="cpu")


@pytest.fixture(scope="session")
def full_lab():
    """Random CLIP ViT-L/14 widths (text 768, vision 1024, projection 768), one layer each."""
    constants = dict(cutoff=0.3, norm=27.0, norm_t=27.5, steps=2, guidance_scale=7.5)
    return S.assemble(random_components(FULL_WIDTH), constants, source="full-width", device="cpu")


@pytest.fixture(scope="session")
def refs():
    return [sample(i, "test", two_objects=0).image for i in range(3)]
