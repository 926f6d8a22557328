# Lint the whole repository (ruff) and type-check the core (mypy on hxn_ptycho/); both are
# configured in pyproject.toml and installed by the test extra.
python -m ruff check .
python -m mypy
