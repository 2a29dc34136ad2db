"""The core every stage and the client share: the contract, the exact transform, the manifest.

`contract` (standard library only), `imaging` (numpy and Pillow: timm's eval transform, bit-exact) and
`manifest` (standard library only) import nothing else of the project, so a client in another service
installs them without torch, and every stage (export -> engines -> repository -> serving) imports them
without importing another stage.
"""
