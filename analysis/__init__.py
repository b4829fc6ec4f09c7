"""Tables and figures over a finished sweep (`python -m analysis.report EXPERIMENT_DIR`)."""
