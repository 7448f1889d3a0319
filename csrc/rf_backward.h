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

// The gradients of rf_window.cpp's causal forward (the hybrid window, sinks and the learned factor; see
// csrc/rf_window_bwd.cpp): [dq, dk, dv, dW, dbias, dS0, dz0, dk_tail0, dv_tail0, dk_sink, dv_sink, dlog_mix],
// fp32. dS, dz, dk_tail, dv_tail: the final state's gradients (or None); dk_sink, dv_sink [R, H_kv, S, .]:
// the gradients of the sink slots the forward read; dlog_mix [R, H_kv] per sequence; dbias [R, H_kv, m].
// o, stats (optional, causal): the forward's output and per-row (top, den) (window_forward's need_stats):
// the backward then reads each row's scales instead of recomputing both parts' numerators. The other
// arguments are window_forward's.
std::vector<at::Tensor> rf_window_backward(
    const at::Tensor& do_in, const c10::optional<at::Tensor>& dS_in, const c10::optional<at::Tensor>& dz_in,
    const c10::optional<at::Tensor>& dkt_in, const c10::optional<at::Tensor>& dvt_in, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& W_in, const at::Tensor& bias_in,
    const at::Tensor& freq_in, const c10::optional<at::Tensor>& psi_in, int64_t kind, double c_t, double c_o,
    double scale, double exact_sq, bool causal, int64_t window, const c10::optional<at::Tensor>& mask_in,
    const at::Tensor& S0_in, const at::Tensor& z0_in, const at::Tensor& m0_in, const at::Tensor& kt_in,
    const at::Tensor& vt_in, const at::Tensor& tail_keep, double den_eps, const c10::optional<at::Tensor>& cu_in,
    const c10::optional<at::Tensor>& sink_k, const c10::optional<at::Tensor>& sink_v,
    const c10::optional<at::Tensor>& sink_from, const c10::optional<at::Tensor>& sink_skip,
    const c10::optional<at::Tensor>& log_mix, const c10::optional<at::Tensor>& o_in,
    const c10::optional<at::Tensor>& stats_in, const c10::optional<at::Tensor>& kshift_in);
