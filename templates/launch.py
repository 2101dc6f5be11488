"""The Flex templates' entry point (FLEX_TEMPLATE_PYTHON_PY_FILE in templates/Dockerfile): runs
the command that the image's ANCHORSCAN_COMMAND names with the launcher's arguments, submits
the job and exits."""

import logging
import os
import sys

from anchorscan.templates.metadata import launch

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    launch(os.environ["ANCHORSCAN_COMMAND"], sys.argv[1:])
