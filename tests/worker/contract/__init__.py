"""The HTTP contract of the served app: one served tiny model shared by these modules."""
