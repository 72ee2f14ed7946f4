"""Callbacks for the training frameworks people already use; each imports its framework itself:

    from pdprune.integrations.lightning import PDPCallback          # pip install 'pdprune[lightning]'
    from pdprune.integrations.transformers import PDPTrainerCallback  # pip install 'pdprune[transformers]'
"""
