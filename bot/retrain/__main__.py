"""`python -m bot.retrain`: run the retraining pipeline in this process, reporting JSON events on stdout."""

import sys

from bot.retrain.pipeline import main

sys.exit(main())
