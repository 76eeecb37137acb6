package embedfleet

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"
)

// Config says where the fleet is. ConfigFromEnv fills it from the same EMBEDFLEET_*
// variables the Python client and the workers read.
type Config struct {
	KafkaBootstrap        []string // EMBEDFLEET_KAFKA_BOOTSTRAP (comma-separated)
	RequestsTopic         string   // EMBEDFLEET_REQUESTS_TOPIC
	ResultsTopic          string   // EMBEDFLEET_RESULTS_TOPIC; the reply topic is ResultsTopic + ".go-<id>"
	KafkaSecurityProtocol string   // PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL
	KafkaSASLMechanism    string   // PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512
	KafkaSASLUsername     string
	KafkaSASLPassword     string
	KafkaSSLCAFile        string
	KafkaSSLCertFile      string // client certificate for Kafka mTLS (with KafkaSSLKeyFile)
	KafkaSSLKeyFile       string
	RedisURL              string // empty: no cache lookup and no model contract from Redis
	RedisUsername         string
	RedisPassword         string
	RedisSSLCAFile        string // CA bundle for rediss:// URLs
	RedisTimeout          time.Duration
	CacheKeyPrefix        string // EMBEDFLEET_CACHE_KEY_PREFIX
	ModelName             string // EMBEDFLEET_MODEL_NAME
	// DefaultModel is the model the fleet serves on the base requests topic (the workers'
	// EMBEDFLEET_DEFAULT_MODEL); every other model's topic is derived from it (routing.go).
	DefaultModel string
	// ModelFingerprint is read from Redis ({prefix}:models:{model}) when empty.
	ModelFingerprint string
	ModelDim         int // EMBEDFLEET_MODEL_DIM; 0: from Redis
	ClientID         string
	Linger           time.Duration
	// Long is the client's default for EmbedOptions.Long ("": truncate): LongPool or
	// LongChunks send every call's texts as long inputs unless the call says otherwise.
	Long LongMode
	// Overlap is the default for EmbedOptions.Overlap (nil: the workers' DefaultWindowOverlap).
	Overlap *int
}

// ConfigFromEnv returns the defaults overridden by the EMBEDFLEET_* environment.
func ConfigFromEnv() Config {
	c := Config{
		KafkaBootstrap:        []string{"127.0.0.1:9092"},
		RequestsTopic:         BaseRequestsTopic,
		ResultsTopic:          "embed.results",
		KafkaSecurityProtocol: "PLAINTEXT",
		KafkaSASLMechanism:    "PLAIN",
		RedisURL:              "redis://127.0.0.1:6379/0",
		RedisTimeout:          time.Second,
		CacheKeyPrefix:        "embedfleet",
		ModelName:             DefaultModel,
		DefaultModel:          DefaultModel,
		Linger:                5 * time.Millisecond,
	}
	set := func(name string, into *string) {
		if v, ok := os.LookupEnv(name); ok && v != "" {
			*into = v
		}
	}
	var bootstrap string
	set("EMBEDFLEET_KAFKA_BOOTSTRAP", &bootstrap)
	if bootstrap != "" {
		c.KafkaBootstrap = splitComma(bootstrap)
	}
	set("EMBEDFLEET_REQUESTS_TOPIC", &c.RequestsTopic)
	set("EMBEDFLEET_RESULTS_TOPIC", &c.ResultsTopic)
	set("EMBEDFLEET_KAFKA_SECURITY_PROTOCOL", &c.KafkaSecurityProtocol)
	set("EMBEDFLEET_KAFKA_SASL_MECHANISM", &c.KafkaSASLMechanism)
	set("EMBEDFLEET_KAFKA_SASL_USERNAME", &c.KafkaSASLUsername)
	set("EMBEDFLEET_KAFKA_SASL_PASSWORD", &c.KafkaSASLPassword)
	set("EMBEDFLEET_KAFKA_SSL_CAFILE", &c.KafkaSSLCAFile)
	set("EMBEDFLEET_KAFKA_SSL_CERTFILE", &c.KafkaSSLCertFile)
	set("EMBEDFLEET_KAFKA_SSL_KEYFILE", &c.KafkaSSLKeyFile)
	set("EMBEDFLEET_REDIS_SSL_CAFILE", &c.RedisSSLCAFile)
	if v, ok := os.LookupEnv("EMBEDFLEET_REDIS_URL"); ok {
		c.RedisURL = v // an explicitly empty URL turns the cache off
	}
	set("EMBEDFLEET_REDIS_USERNAME", &c.RedisUsername)
	set("EMBEDFLEET_REDIS_PASSWORD", &c.RedisPassword)
	set("EMBEDFLEET_CACHE_KEY_PREFIX", &c.CacheKeyPrefix)
	set("EMBEDFLEET_MODEL_NAME", &c.ModelName)
	set("EMBEDFLEET_DEFAULT_MODEL", &c.DefaultModel)
	set("EMBEDFLEET_MODEL_FINGERPRINT", &c.ModelFingerprint)
	if v := os.Getenv("EMBEDFLEET_REQUESTS_TOPIC"); v == "" {
		// Not set: the model's own topic by the fleet's naming rule (routing.go).
		c.RequestsTopic = RequestsTopicFor(c.ModelName, c.DefaultModel, BaseRequestsTopic)
	}
	var dim string
	set("EMBEDFLEET_MODEL_DIM", &dim)
	if n, err := strconv.Atoi(dim); err == nil && n > 0 {
		c.ModelDim = n
	}
	return c
}

// RequestsTopicOf is where jobs for model go: the configured RequestsTopic for the client's own
// model, the naming rule's topic for any other model of the fleet. A client of the default model
// takes its configured topic as the rule's base ("jobs" -> "jobs.<model>"), as the Python
// client's ClientConfig.requests_topic_of does.
func (c Config) RequestsTopicOf(model string) string {
	if model == c.ModelName && c.RequestsTopic != "" {
		return c.RequestsTopic
	}
	base := BaseRequestsTopic
	if c.ModelName == c.defaultModel() && c.RequestsTopic != "" {
		base = c.RequestsTopic
	}
	return RequestsTopicFor(model, c.defaultModel(), base)
}

// ForModel is this configuration for a client of another model of the same fleet: its topic by
// the naming rule (RequestsTopicOf), its fingerprint and width read from Redis (the model's
// contract). A Client embeds with one model; to use several, open one Client per model:
//
//	small, _ := embedfleet.NewClient(ctx, cfg)
//	large, _ := embedfleet.NewClient(ctx, cfg.ForModel("all-mpnet-base-v2"))
//
// Each client has its own reply topic: a fresh ClientID when it is empty, else ClientID with
// ".<model>" appended.
func (c Config) ForModel(model string) Config {
	if model == c.ModelName {
		return c
	}
	out := c
	if out.ClientID != "" {
		out.ClientID += "." + unsafeModelChars.ReplaceAllString(model, "_")
	}
	out.RequestsTopic = c.RequestsTopicOf(model)
	out.ModelName = model
	out.ModelFingerprint = ""
	out.ModelDim = 0
	return out
}

func (c Config) defaultModel() string {
	if c.DefaultModel == "" {
		return DefaultModel
	}
	return c.DefaultModel
}

// ReplyTopic is the client's private results topic (it matches the workers'
// allow-list embed\.results.* when ResultsTopic does).
func (c Config) ReplyTopic() string {
	return c.ResultsTopic + ".go-" + c.ClientID
}

func splitComma(s string) []string {
	var out []string
	start := 0
	for i := 0; i <= len(s); i++ {
		if i == len(s) || s[i] == ',' {
			if part := trimSpace(s[start:i]); part != "" {
				out = append(out, part)
			}
			start = i + 1
		}
	}
	return out
}

func trimSpace(s string) string {
	for len(s) > 0 && (s[0] == ' ' || s[0] == '\t') {
		s = s[1:]
	}
	for len(s) > 0 && (s[len(s)-1] == ' ' || s[len(s)-1] == '\t') {
		s = s[:len(s)-1]
	}
	return s
}

func newClientID() string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func newRequestID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// String is the configuration with its secrets masked (the SASL and Redis passwords, and a
// password in the Redis URL), so that printing a Config with %v or %+v never shows them.
func (c Config) String() string {
	shown := c
	if shown.KafkaSASLPassword != "" {
		shown.KafkaSASLPassword = "***"
	}
	if shown.RedisPassword != "" {
		shown.RedisPassword = "***"
	}
	shown.RedisURL = maskURLPassword(shown.RedisURL)
	type plain Config // the same fields without this method: no recursion
	return fmt.Sprintf("%+v", plain(shown))
}

// GoString masks the same secrets for %#v.
func (c Config) GoString() string { return "embedfleet.Config" + c.String() }

// maskURLPassword turns redis://user:secret@host into redis://user:***@host.
func maskURLPassword(raw string) string {
	parsed, err := url.Parse(raw)
	if err != nil || parsed.User == nil {
		return raw
	}
	if _, has := parsed.User.Password(); !has {
		return raw
	}
	parsed.User = url.UserPassword(parsed.User.Username(), "***")
	return strings.Replace(parsed.String(), "%2A%2A%2A", "***", 1)
}
