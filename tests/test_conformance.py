"""Every installed modality passes the conformance suite (modalities.testing)."""
from __future__ import annotations

import pytest

from modalities.contract import available_modalities
from modalities.testing import CHECKS, build

MODALITIES = available_modalities()


@pytest.fixture(scope="module", params=MODALITIES)
def built(request, tmp_path_factory):
    return build(request.param, tmp_path_factory.mktemp(f"conformance-{request.param}"))


@pytest.mark.parametrize("check", list(CHECKS))
def test_modality_conforms(built, check):
    CHECKS[check](built)


def test_image_is_installed():
    assert "image" in MODALITIES  # the suite must run on at least the image modality


def test_a_broken_modality_fails_the_suite(built, monkeypatch):
    monkeypatch.setattr(type(built.modality), "metrics", ())
    with pytest.raises(AssertionError):
        CHECKS["protocol"](built)
