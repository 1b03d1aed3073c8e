"""Every case `tests/slow_tests.py` leaves to `make test-slow` still exists: a renamed test
would otherwise silently move back into `make test` and its time budget."""

from slow_tests import SLOW
from testing_utils import REPO


def test_every_listed_slow_case_names_a_test_function():
    missing = []
    for node_id in SLOW:
        path, _, name = node_id.partition("::")
        function = name.split("[")[0]
        file = REPO / path
        if not file.is_file() or f"def {function}(" not in file.read_text():
            missing.append(node_id)
    assert not missing, f"tests/slow_tests.py lists cases that do not exist: {missing}"
