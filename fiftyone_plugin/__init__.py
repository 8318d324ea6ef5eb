"""FiftyOne plugin ``@insid3/fiftyone``: segment by example in the App, review failures.

FiftyOne loads this file as the plugin's entry point and calls :func:`register`. The same
folder is the importable package ``fiftyone_plugin`` (``insid3 fiftyone install`` links it
into FiftyOne's plugins directory); importing it stays light, the operators and their
FiftyOne imports load only when FiftyOne registers them.
"""


def register(plugin):
    """Register the plugin's operators and its review panel on FiftyOne's plugin context."""
    from .calibrate import CalibrateReferences
    from .operators import SegmentByExample
    from .panel import ReviewPanel
    from .review import QualityReport, SaveFailureViews, TagReferences

    for operator in (SegmentByExample, CalibrateReferences, QualityReport, SaveFailureViews, TagReferences,
                     ReviewPanel):
        plugin.register(operator)
