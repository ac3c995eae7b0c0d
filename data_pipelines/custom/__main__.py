"""`python -m data_pipelines.custom example --out DIR`: the worked example's label files."""

import sys

from data_pipelines.custom import example

if __name__ == "__main__":
  sys.exit(example.main())
