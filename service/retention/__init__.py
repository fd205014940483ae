"""How long things are kept: a day of IDs is dropped whole once its tasks are finished
and old, and the bookkeeping that grows with time expires with it."""
