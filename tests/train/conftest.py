from train_support import make_config  # noqa: F401  (fixture)
