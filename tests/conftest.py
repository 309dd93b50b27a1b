"""Suite-wide pytest hooks.

Every test under tests/integration gets the ``integration`` marker here, so it cannot be
forgotten and ``pytest -m "not integration"`` never needs a broker.
"""

from pathlib import Path

import pytest

INTEGRATION_DIR = Path(__file__).parent / "integration"


# tryfirst: the marker must be on the items before pytest's own hook applies `-m`.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(INTEGRATION_DIR):
            item.add_marker(pytest.mark.integration)
