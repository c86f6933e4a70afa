"""The engine: training, prediction, evaluation and cross-validation, as functions the scripts wire together."""
