"""Fitting a model: the training config checked, the loop, its phases, checkpoints and resume, devices,
feature caching, class weights, calibration, recipes, and `tlserve summary`."""
