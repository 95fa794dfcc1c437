"""Study files: one YAML file per tuning campaign (``mnist1d_cnn.yaml`` is the default)."""
