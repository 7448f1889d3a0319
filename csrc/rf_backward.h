// The fused backward of the CPU backend (csrc/rf_backward.cpp), bound next to the forward in
// rf_attention.cpp.
#pragma once

#include <torch/extension.h>

#include <vector>

// The gradients of rf_attention.cpp's forward: [dq, dk, dv, dW, dbias, dS0, dz0], fp32. do: the output's
// gradient; dS, dz: the final state's (or None); S, z, log_scale: the forward's final state (needed when
// non-causal); dW [H_kv, m, D] summed over the sequences; dbias [R, H_kv, m] per batch row or packed
// sequence; dS0, dz0 undefined without an initial state. The other arguments are the forward's.
std::vector<at::Tensor> rf_attention_backward(
    const at::Tensor& do_in, const c10::optional<at::Tensor>& dS_in, const c10::optional<at::Tensor>& dz_in,
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& W_in,
    const at::Tensor& bias_in, const at::Tensor& freq_in, const c10::optional<at::Tensor>& psi_in, int64_t kind,
    double c_t, double c_o, double scale, bool causal, const c10::optional<at::Tensor>& mask_in,
    const c10::optional<at::Tensor>& S0_in, const c10::optional<at::Tensor>& z0_in,
    const c10::optional<at::Tensor>& m0_in, const c10::optional<at::Tensor>& Sf_in,
    const c10::optional<at::Tensor>& zf_in, const c10::optional<at::Tensor>& mf_in, double den_eps,
    const c10::optional<at::Tensor>& cu_in);
