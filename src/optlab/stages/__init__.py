"""The DVC stages, one module each, run by ``dvc.yaml`` as ``python -m optlab.stages.<name>``:
parse the paths ``dvc.yaml`` gives, load params, call the package. Nothing else imports them."""
