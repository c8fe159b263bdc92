"""`python -m merge_mix.cli ...`: the `merge-mix` command (used by torchrun -m merge_mix.cli)."""

from merge_mix.cli import main

if __name__ == "__main__":
    main()
