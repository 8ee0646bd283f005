"""The `ptst` command (`cli.py`) and the subcommands that only drive other packages: `serve`,
`templates`, `detect`, `logs`, `bench`. The engine's commands (`up`, `backend`, `demo-model`)
live in `ptst.engine`, the benches' in `ptst.bench`."""
