"""The open pipeline from web-scale image–caption data to trained DALL-E style priors."""

__version__ = "0.1.0"

import os as _os

# img2dataset imports albumentations, which checks PyPI for updates on import (a network call, and a hang where there
# is no network). Setting this here covers every entry point: CLI, jobs, Ray workers, tests.
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
