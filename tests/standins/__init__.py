"""Local stand-ins for the Looker API and Segment's Tracking API, used by the tests and the demo."""
