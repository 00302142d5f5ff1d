"""Model stage: where training starts (a base or an earlier run), loading, new tokens, built-in models.

`start` resolves model.path, `load` picks device and precision and loads tokenizer and weights, `vocab`
adds tokens, `builtin` provisions `builtin:` models into the cache (`tiny` builds the tiny ones).
"""
