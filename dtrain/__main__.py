"""`python -m dtrain <command> ...`: the `dtrain` command (see dtrain.cli)."""
from dtrain.cli import main

if __name__ == "__main__":
    main()
