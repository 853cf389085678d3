"""Image providers: one attempt at one image against one backend.

base.py holds the contract (ImageRequest, GeneratedImage, the ProviderError family, the ImageProvider
protocol, ProviderKind); http.py the plumbing the network providers share; one module per protocol
(procedural, openai, automatic1111, comfyui + comfyui_workflow); failover.py several endpoints behind
one provider; factory.py builds a model's provider from its catalogue entry. The retry policy over a
provider is app/services/image_service.py.
"""
