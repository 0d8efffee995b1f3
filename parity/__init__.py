"""The parity suite: the same model and spec on both backends, compared logit by logit."""
