"""The user-facing commands. Each module runs as a script (``python launch/pretrain.py``,
``deepspeed launch/pretrain.py``), as a module (``python -m launch.pretrain``), and, installed,
as a subcommand of ``scfm`` (`launch.scfm`)."""
