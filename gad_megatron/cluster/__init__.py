"""Ray placement of worker groups. Worker classes never import Ray; this package carries them."""
