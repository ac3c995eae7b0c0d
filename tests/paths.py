"""Where things are, for every test: the repository root, bench/ and the fixture files."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")
FIXTURES = os.path.join(REPO, "tests", "fixtures")
