"""The tools that read experiments: experiments and their statistics, optlab compare, the CI gate,
sweeps, the learning-rate range test, and the optlab command. No stage imports them."""
