package embedfleet

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"strings"
	"testing"
	"time"
)

func TestPartitionKeyIsSHA256OfNFC(t *testing.T) {
	sum := sha256.Sum256([]byte("Café"))
	if got := PartitionKey("Cafe\u0301"); got != hex.EncodeToString(sum[:]) {
		t.Errorf("PartitionKey = %s", got)
	}
}

func TestPlanDedupsAndKeysByContentHash(t *testing.T) {
	p, err := planRequests([]string{"x", "Cafe\u0301", "y", "x", "Café"}, "fp", "query", 0, "")
	if err != nil {
		t.Fatal(err)
	}
	if !p.byContentHash || len(p.distinct) != 3 || len(p.failures) != 0 {
		t.Fatalf("plan: %+v", p)
	}
	want, _ := ContentHash("x", "fp", "query", 0)
	if p.distinct[0].key != want || len(p.distinct[0].indices) != 2 || p.distinct[1].indices[1] != 4 {
		t.Errorf("distinct: %+v %+v", p.distinct[0], p.distinct[1])
	}
	noModel, _ := planRequests([]string{"x"}, "", "", 0, "")
	if noModel.byContentHash || noModel.distinct[0].key != PartitionKey("x") {
		t.Errorf("without a fingerprint: %+v", noModel.distinct[0])
	}
}

func TestPlanFailsHopelessTextsLocally(t *testing.T) {
	texts := []string{"ok", "", " \t\n", "\xff", strings.Repeat("x", MaxTextBytes+1)}
	p, err := planRequests(texts, "fp", "", 0, "")
	if err != nil {
		t.Fatal(err)
	}
	codes := []string{"empty_text", "empty_text", "invalid_encoding", "text_too_long"}
	if len(p.failures) != len(codes) || len(p.distinct) != 1 {
		t.Fatalf("failures %+v", p.failures)
	}
	for i, f := range p.failures {
		if f.Index != i+1 || f.Code != codes[i] {
			t.Errorf("failure %d: %+v", i, f)
		}
	}
}

func TestConfigFromEnv(t *testing.T) {
	t.Setenv("EMBEDFLEET_KAFKA_BOOTSTRAP", "a:1, b:2")
	t.Setenv("EMBEDFLEET_REQUESTS_TOPIC", "req")
	t.Setenv("EMBEDFLEET_RESULTS_TOPIC", "embed.results.x")
	t.Setenv("EMBEDFLEET_REDIS_URL", "")
	t.Setenv("EMBEDFLEET_MODEL_FINGERPRINT", "fp")
	t.Setenv("EMBEDFLEET_MODEL_DIM", "8")
	t.Setenv("EMBEDFLEET_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
	c := ConfigFromEnv()
	if len(c.KafkaBootstrap) != 2 || c.KafkaBootstrap[1] != "b:2" || c.RequestsTopic != "req" ||
		c.RedisURL != "" || c.ModelFingerprint != "fp" || c.ModelDim != 8 || c.KafkaSASLMechanism != "SCRAM-SHA-512" {
		t.Errorf("config: %+v", c)
	}
	c.ClientID = "abc"
	if c.ReplyTopic() != "embed.results.x.go-abc" {
		t.Errorf("reply topic %s", c.ReplyTopic())
	}
}

func TestKafkaOptionsCheckSecuritySettings(t *testing.T) {
	c := ConfigFromEnv()
	c.KafkaSecurityProtocol = "SASL_SSL"
	if _, err := kafkaOptions(c); err == nil {
		t.Error("SASL without a user name must fail")
	}
	c.KafkaSASLUsername, c.KafkaSASLMechanism = "u", "SCRAM-SHA-256"
	if _, err := kafkaOptions(c); err != nil {
		t.Error(err)
	}
	c.KafkaSecurityProtocol = "CARRIER_PIGEON"
	if _, err := kafkaOptions(c); err == nil {
		t.Error("an unknown protocol must fail")
	}
}

func TestModelContractAndKeys(t *testing.T) {
	c, ok := ParseModelContract(map[string]string{"fingerprint": "abc", "dim": "384", "max_tokens": "256",
		"tasks": `["query"]`, "dimensions": "[128, 384]"})
	if !ok || c.Dim != 384 || c.MaxTokens != 256 || len(c.Tasks) != 1 || c.Dimensions[0] != 128 {
		t.Errorf("contract %+v", c)
	}
	if _, ok := ParseModelContract(map[string]string{}); ok {
		t.Error("an empty hash is no contract")
	}
	if _, ok := ParseModelContract(map[string]string{"fingerprint": "x", "dim": "many"}); ok {
		t.Error("a malformed dim is no contract")
	}
	if k := VectorKey("p", "org/model v2", 8, "k"); k != "p:org_model_v2:8:k" {
		t.Errorf("vector key %s", k)
	}
	if k := ContractKey("embedfleet", "all-MiniLM-L6-v2"); k != "embedfleet:models:all-MiniLM-L6-v2" {
		t.Errorf("contract key %s", k)
	}
}

func TestRecordResultsAndErrors(t *testing.T) {
	c := &Client{pending: map[string]waiter{}}
	vectors := make([]Embedding, 3)
	entry := &distinctText{key: "k", text: "t", indices: []int{0, 2}}
	encoded := EncodeVectorBase64([]float32{1, 2})
	ch := make(chan wireResult, 1)
	c.pending["r1"] = waiter{ch: ch, key: "k", dim: 2}
	c.dispatch([]byte(`not json`))
	c.dispatch([]byte(`{"id":"stranger","vector":[1]}`))
	// The right id with another key or width is a forgery (or a bug): ignored, still waiting.
	c.dispatch([]byte(`{"id":"r1","key":"other","dim":2,"vector_b64":"` + encoded + `"}`))
	c.dispatch([]byte(`{"id":"r1","key":"k","dim":3,"vector_b64":"` + encoded + `"}`))
	c.dispatch([]byte(`{"id":"r1","dim":2,"vector_b64":"` + encoded + `"}`))
	if len(c.pending) != 1 || len(ch) != 0 || c.Stats().Mismatched != 3 {
		t.Fatalf("a mismatched result was accepted: %d pending, %d delivered, %+v", len(c.pending), len(ch), c.Stats())
	}
	c.dispatch([]byte(`{"id":"r1","key":"k","dim":2,"vector_b64":"` + encoded + `","cached":true}`))
	if result := <-ch; result.VectorB64 == nil || *result.VectorB64 != encoded || len(c.pending) != 0 {
		t.Errorf("dispatch: %+v, %d pending", result, len(c.pending))
	}
	// An error result without a key (a validation error) answers a request waiting for a key.
	errCh := make(chan wireResult, 1)
	c.pending["r2"] = waiter{ch: errCh, key: "k", dim: 2}
	c.dispatch([]byte(`{"id":"r2","error":{"code":"empty_text","message":"empty"}}`))
	if len(errCh) != 1 {
		t.Error("an error result without a key was not delivered")
	}
	failures := c.record(wireResult{VectorB64: &encoded, Cached: true}, entry, vectors, nil)
	if len(failures) != 0 || vectors[0].Vector[1] != 2 || vectors[2].Vector[0] != 1 || &vectors[0].Vector[0] == &vectors[2].Vector[0] {
		t.Errorf("vectors %v", vectors)
	}
	bad := wireResult{}
	bad.Error = &struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	}{"empty_text", "text is empty"}
	failures = c.record(bad, &distinctText{indices: []int{1}}, vectors, nil)
	if len(failures) != 1 || failures[0].Index != 1 || failures[0].Code != "empty_text" {
		t.Errorf("failures %+v", failures)
	}
	if s := c.Stats(); s.Cached != 2 || s.Failed != 1 {
		t.Errorf("stats %+v", s)
	}
	err := error(&BatchError{Failures: failures, Total: 3})
	var batch *BatchError
	if !errors.As(err, &batch) || !strings.Contains(err.Error(), "1 of 3 texts failed") {
		t.Error(err)
	}
	timeout := &TimeoutError{Missing: 2, Total: 3, Cause: errors.New("context deadline exceeded")}
	if !strings.Contains(timeout.Error(), "embedfleet worker") {
		t.Error(timeout)
	}
}

func TestNewClientSaysWhereKafkaIsMissing(t *testing.T) {
	cfg := ConfigFromEnv()
	cfg.KafkaBootstrap, cfg.RedisURL = []string{"127.0.0.1:1"}, ""
	ctx, cancel := contextWithTimeout(2 * time.Second)
	defer cancel()
	_, err := NewClient(ctx, cfg)
	if err == nil || !strings.Contains(err.Error(), "embedfleet stack up") {
		t.Errorf("err = %v", err)
	}
}
