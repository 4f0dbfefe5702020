"""Open membership, pure: partial views (HyParView), the network-size estimate, mixing weights on
a changing neighbourhood. Time is an input; the node and the host move the messages."""
