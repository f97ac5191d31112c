"""``python -m zoo.bench NAME [options]``: see :mod:`zoo.bench`."""

from zoo.bench import main

if __name__ == "__main__":
    main()
