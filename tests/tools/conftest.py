"""Fixtures of the tool tests; the shared settings live in tool_helpers.py."""

import pytest


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """A folder for the synthetic data, shared by the tests of a session."""
    return str(tmp_path_factory.mktemp("datasets"))
