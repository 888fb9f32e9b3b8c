"""The operator e2e fixtures (operator_factory, datasets, installed_crd) for the observability
tests, loaded from tests/operator/conftest.py rather than copied."""

import importlib.util
import sys
from pathlib import Path

OPERATOR_TESTS = Path(__file__).resolve().parents[1] / "operator"
sys.path.insert(0, str(OPERATOR_TESTS))

_spec = importlib.util.spec_from_file_location("operator_e2e_fixtures",
                                               OPERATOR_TESTS / "conftest.py")
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)

operator_factory = _fixtures.operator_factory
datasets = _fixtures.datasets
installed_crd = _fixtures.installed_crd
