# Package names: the one normalisation by which the device, the list check
# and the publisher's tools compare them. Pure: CPython imports it too.


def normalize(name):
    """Wheel names compare as PEP 503 / wheel file names do: foo.Bar == foo-bar == foo_bar."""
    return name.lower().replace("-", "_").replace(".", "_")
