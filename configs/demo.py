"""`tradojax demo`'s built-in settings, as a config file to copy and change."""

from tradojax.demo import default_config


def get_config():
    return default_config()
