"""The graph engine: exact input Hessians of any traceable model from its ATen graph.

``capture`` traces one sample's computation, ``plan`` classifies its nodes by rule and
picks where to cut, ``hessian`` runs the plan. ``engine.api`` tries this path after the
structured one and before the generic one.
"""
