"""The Python API: the functions the ``ppg`` commands themselves call, in one import::

    from ppg.api import evaluate, load_config, train

A module of its own rather than names on the package: importing ``ppg`` stays cheap (every Ray
worker imports it), and only a caller of the API pays for the driver's tree (Ray Train, Serve,
transformers: a few seconds).
"""

from ppg.config import load_config
from ppg.driver import train
from ppg.evaluate import evaluate

__all__ = ["evaluate", "load_config", "train"]
