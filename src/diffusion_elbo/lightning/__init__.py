"""Lightning pieces that orchestrate the core: the module, metrics, callbacks, LR schedules."""
